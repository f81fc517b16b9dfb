"""lorakit: parameter-efficient fine-tuning with LoRA, PEFT-compatible.

Replace ``peft`` with ``lorakit`` in your imports::

    from lorakit import LoraConfig, TaskType, get_peft_model, PeftModel
"""

from lorakit import cpu_blas
from lorakit.auto import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
)
from lorakit.config import PeftConfig, PeftType, TaskType
from lorakit.errors import (
    AdapterExistsError,
    AdapterFileError,
    AdapterNotFoundError,
    ConfigError,
    LorakitError,
    MergeError,
    ShapeMismatchError,
    TargetNotFoundError,
    UnsupportedModuleError,
)
from lorakit.functional import (
    get_base_model_state_dict,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    load_peft_weights,
    set_base_model_state_dict,
    set_peft_model_state_dict,
)
from lorakit.kbit import prepare_model_for_kbit_training, quantize, replace_lora_weights_loftq
from lorakit.layers import ModulesToSaveWrapper
from lorakit.model import PeftModel
from lorakit.status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status
from lorakit.tasks import (
    MODEL_TYPE_TO_PEFT_MODEL,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    get_peft_model,
)
from lorakit.tuners.adalora import AdaLoraConfig
from lorakit.tuners.adalora.model import AdaLoraModel
from lorakit.tuners.bottleneck import BottleneckConfig
from lorakit.tuners.bottleneck.adapterhub import load_adapters_library
from lorakit.tuners.bottleneck.model import BottleneckModel
from lorakit.tuners.ia3 import IA3Config
from lorakit.tuners.ia3.model import IA3Model
from lorakit.tuners.lora import LoraConfig
from lorakit.tuners.lora.corda import CordaConfig, preprocess_corda
from lorakit.tuners.lora.delta import lora_delta, lora_scaling
from lorakit.tuners.lora.eva import EvaConfig, get_eva_state_dict, initialize_lora_eva_weights
from lorakit.tuners.lora.hotswap import (
    hotswap_adapter,
    hotswap_adapter_from_state_dict,
    prepare_model_for_compiled_hotswap,
)
from lorakit.tuners.lora.layer import LoraLayer
from lorakit.tuners.lora.loraplus import create_loraplus_optimizer
from lorakit.tuners.lora.model import LoraModel
from lorakit.tuners.p_tuning import PromptEncoderConfig, PromptEncoderReparameterizationType
from lorakit.tuners.p_tuning.encoder import PromptEncoder
from lorakit.tuners.p_tuning.model import PTuningModel
from lorakit.tuners.prefix_tuning import PrefixTuningConfig
from lorakit.tuners.prefix_tuning.encoder import PrefixEncoder
from lorakit.tuners.prefix_tuning.model import PrefixTuningModel
from lorakit.tuners.prompt_learning import PromptLearningConfig
from lorakit.tuners.prompt_tuning import PromptTuningConfig, PromptTuningInit
from lorakit.tuners.prompt_tuning.encoder import PromptEmbedding
from lorakit.tuners.prompt_tuning.model import PromptTuningModel
from lorakit.tuners.trainable_tokens import TrainableTokensConfig
from lorakit.tuners.trainable_tokens.model import TrainableTokensModel

__version__ = "0.1.0"

# Before any matrix product runs in the process, or it cannot take effect (see lorakit/cpu_blas.py).
cpu_blas.apply()

__all__ = [
    "MODEL_TYPE_TO_PEFT_MODEL",
    "AdaLoraConfig",
    "AdaLoraModel",
    "AdapterExistsError",
    "AdapterFileError",
    "AdapterNotFoundError",
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "BottleneckConfig",
    "BottleneckModel",
    "ConfigError",
    "CordaConfig",
    "EvaConfig",
    "IA3Config",
    "IA3Model",
    "LoraConfig",
    "PeftConfig",
    "LoraLayer",
    "LoraModel",
    "LorakitError",
    "MergeError",
    "ModulesToSaveWrapper",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "PTuningModel",
    "PrefixEncoder",
    "PrefixTuningConfig",
    "PrefixTuningModel",
    "PromptEmbedding",
    "PromptEncoder",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptLearningConfig",
    "PromptTuningConfig",
    "PromptTuningInit",
    "PromptTuningModel",
    "ShapeMismatchError",
    "TargetNotFoundError",
    "TaskType",
    "TrainableTokensConfig",
    "TrainableTokensModel",
    "TunerLayerStatus",
    "TunerModelStatus",
    "UnsupportedModuleError",
    "create_loraplus_optimizer",
    "get_base_model_state_dict",
    "get_eva_state_dict",
    "get_layer_status",
    "get_model_status",
    "get_peft_model",
    "get_peft_model_state_dict",
    "hotswap_adapter",
    "hotswap_adapter_from_state_dict",
    "initialize_lora_eva_weights",
    "inject_adapter_in_model",
    "load_adapters_library",
    "load_peft_weights",
    "prepare_model_for_compiled_hotswap",
    "preprocess_corda",
    "prepare_model_for_kbit_training",
    "quantize",
    "replace_lora_weights_loftq",
    "set_base_model_state_dict",
    "set_peft_model_state_dict",
    "lora_delta",
    "lora_scaling",
]
