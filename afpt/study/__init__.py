"""The study: ``stage=pipeline`` (forgetting vs baseline through every stage), its report, and sweep summaries."""
