"""The services of alphazero-llm-trainer beside the orchestrator: the trainer (trainer/), the trainer's wire
protocol that both sides import (protocol/, no torch), and the request-size limit both HTTP apps share."""
