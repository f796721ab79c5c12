"""The life of a job, knowing nothing of HTTP: submit, run, cancel, resume; its record, events and context."""
