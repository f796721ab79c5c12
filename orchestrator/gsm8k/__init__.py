"""GSM8K: the problems and their prompt, answer extraction and comparison, paired statistics."""
