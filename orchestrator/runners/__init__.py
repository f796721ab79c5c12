"""What a job does once it runs: the train loop and the eval, from a request to stored steps, files and a result."""
