"""The built-in world: a synthetic constitution world where SAMI's effect is measurable on a CPU in minutes.

`rules` (principles, the rule judge) and `grammar` (queries, responses) are light; `base_model` (the cached,
pretrained tiny base model) needs torch and transformers, so nothing is imported here.
"""
