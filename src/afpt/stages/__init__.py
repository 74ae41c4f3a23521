"""Stages of the afpt study; each is a pure ``run(cfg) -> metrics`` function."""
