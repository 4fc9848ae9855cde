"""The preference-labelling server: prompts, responses from the user's checkpoints, pair tasks,
annotators, gold pairs, agreement and quality, and a training-ready export (seed 002 §4.2)."""
