"""The engine of the prompt-learning methods (prompt tuning, P-tuning, prefix tuning), each of which has its own
room: :mod:`lorakit.tuners.prompt_tuning`, :mod:`lorakit.tuners.p_tuning`, :mod:`lorakit.tuners.prefix_tuning`.

* :mod:`.config`: :class:`PromptLearningConfig`, the fields they share and how the sizes are read from the model
* :mod:`.encoder`: the base of their prompt encoders
* :mod:`.model`: :class:`~.model.PromptLearningModel`, the tuner (adapters by name, prompt, files, switching)
* :mod:`.tasks`: the forward of each task type; :mod:`.generation`: ``generate``; :mod:`.cache`: prefixes as
  transformers' caches
"""

from lorakit.tuners.prompt_learning.config import PROMPT_KEY, PromptLearningConfig

__all__ = ["PROMPT_KEY", "PromptLearningConfig"]
