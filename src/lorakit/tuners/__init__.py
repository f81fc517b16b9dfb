"""One room per method. Each package holds a method's config (and, as they move in, its tuner and layers) and
registers it with :func:`lorakit.config.register_method`; the generic level (``lorakit.config``,
``lorakit.model``) never names a method.

* :mod:`lorakit.tuners.lora`: LoRA (and DoRA, rsLoRA, LoftQ as its options)
* :mod:`lorakit.tuners.adalora`: AdaLoRA
* :mod:`lorakit.tuners.ia3`: IA³
* :mod:`lorakit.tuners.prompt_tuning`: prompt tuning
* :mod:`lorakit.tuners.p_tuning`: P-tuning
* :mod:`lorakit.tuners.prefix_tuning`: prefix tuning
* :mod:`lorakit.tuners.prompt_learning`: the engine the three prompt-learning methods share (not a method)
* :mod:`lorakit.tuners.bottleneck`: bottleneck adapters (Houlsby, Pfeiffer; the adapters library's files)
"""
