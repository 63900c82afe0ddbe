"""The ground floor: errors, atomic storage and hashing, issue facts, validation.

Every other package may import from here, and this package imports nothing of the project, so
that the layers above (model, interventions, rules, engine orchestration) never form a cycle.
"""
