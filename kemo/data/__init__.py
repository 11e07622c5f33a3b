"""Corpus access: the AI-Hub index (``aihub``) and the AI-Hub-shaped generator (``synth``)."""
