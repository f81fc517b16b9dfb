"""One room per method. Each package holds a method's config (and, as they move in, its tuner and layers) and
registers it with :func:`lorakit.config.register_method`; the generic level (``lorakit.config``,
``lorakit.model``) never names a method.

* :mod:`lorakit.tuners.lora`: LoRA (and DoRA, rsLoRA, LoftQ as its options)
* :mod:`lorakit.tuners.adalora`: AdaLoRA
* :mod:`lorakit.tuners.ia3`: IA³
"""
