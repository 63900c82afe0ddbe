"""The decision loop: monitor -> decide -> apply to a copy -> verify -> accept or escalate."""
