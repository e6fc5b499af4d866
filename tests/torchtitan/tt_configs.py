"""Deliberately wrong configs (``--module tests.torchtitan.bad_configs``): each must fail before step 1."""

from torchtitan.components.optimizer import ParamGroupConfig

from torchtitan_ext.config_registry import debug_muon, llama2_model
from torchtitan_ext.pc import PCConverter


def pc_targets_match_nothing():
    config = debug_muon()
    config.model_spec = llama2_model("debug", pc=PCConverter.Config(targets="no_such_module", degree=5))
    return config


def muon_on_norm_weights():
    config = debug_muon()
    muon, adamw = config.optimizer.param_groups
    config.optimizer.param_groups = [
        ParamGroupConfig(
            pattern=r"(^|\.)(attention_norm|ffn_norm)\.weight$|" + muon.pattern,
            optimizer_name="Muon",
            optimizer_kwargs=muon.optimizer_kwargs,
        ),
        adamw,
    ]
    return config
