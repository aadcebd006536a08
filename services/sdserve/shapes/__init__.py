"""The built-in default model: its synthetic data, its training, a checker of prompt adherence
that is independent of any model, its evaluation, and its weights (`default_model/`).

None of this is on the serving path; the stages load `default_model/` like any other folder.
"""
