"""The trainer service: holds the student (a causal LM with a LoRA adapter), serves it over the OpenAI API,
scores completions and applies GRPO steps. api/ is the HTTP layer; engine.py the operations behind it; student.py
the model and its state, with generation.py, scoring.py and learning.py its three operations."""
