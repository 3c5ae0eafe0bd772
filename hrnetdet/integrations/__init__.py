"""Adapters for tools written outside the project, each importing its tool only when used
(``hrnetdet.integrations.sahi``: SAHI's sliced prediction on an hrnetdet model;
``hrnetdet.integrations.ray``: batch inference with Ray Data, and ``hrnetdet predict --engine ray``)."""
