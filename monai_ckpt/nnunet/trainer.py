"""``nnUNetTrainerCkpt``: nnU-Net's own trainer, training our checkpoint-aware copy of the network its plans name.

Everything but the network is nnU-Net's (data loading, augmentation, loss, optimizer, autocast, torch.compile, DDP,
validation, checkpoints); the network is `CheckpointPlainConvUNet` or `CheckpointResidualEncoderUNet` with the
parent's weights initialisation, so a run from the same seed trains exactly as ``nnUNetTrainer`` (same losses, same
weights) in less memory, and its checkpoints load into ``nnUNetTrainer`` (and back).

The checkpoint policy, in this order: the environment variable ``MONAI_CKPT_POLICY`` (a policy name such as ``cheap``,
or JSON such as ``{"budget_gb": 10}``), the configuration's ``"checkpoint_policy"`` in the plans file (which ``python
-m monai_ckpt.nnunet plan`` writes), else ``"all"``.

nnU-Net finds this trainer in the folder ``python -m monai_ckpt.nnunet trainers-path`` prints::

    export nnUNet_extTrainer=$(python -m monai_ckpt.nnunet trainers-path)
    nnUNetv2_train DATASET 3d_fullres FOLD -tr nnUNetTrainerCkpt
"""

from __future__ import annotations

import json
import os
from typing import Any

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from torch import nn

from ..policies import PolicySpec, validate_policy
from .networks import checkpoint_class_for, nnunet_network_classes

__all__ = ["POLICY_VARIABLE", "checkpoint_policy_of", "checkpointed_network_from_plans", "nnUNetTrainerCkpt"]

POLICY_VARIABLE = "MONAI_CKPT_POLICY"


def checkpoint_policy_of(configuration: dict) -> PolicySpec:
    """The policy ``nnUNetTrainerCkpt`` uses for a plans configuration: ``$MONAI_CKPT_POLICY`` (a name or JSON), the
    configuration's ``"checkpoint_policy"``, else ``"all"``.

    Raises:
        ValueError: for a policy that is not valid (the message lists the valid ones and says where it came from).
    """
    text = os.environ.get(POLICY_VARIABLE, "").strip()
    if text:
        try:
            spec, source = json.loads(text), f"${POLICY_VARIABLE}"
        except json.JSONDecodeError:
            spec, source = text, f"${POLICY_VARIABLE}"
    else:
        spec, source = configuration.get("checkpoint_policy", "all"), "the plans configuration's checkpoint_policy"
    try:
        validate_policy(spec)
    except ValueError as error:
        raise ValueError(f"{source} = {spec!r}: {error}") from None
    return spec


def checkpointed_network_from_plans(arch_class_name: str, arch_kwargs: dict, arch_kwargs_req_import: Any,
                                    input_channels: int, output_channels: int, allow_init: bool = True,
                                    deep_supervision: bool | None = None,
                                    checkpoint_policy: PolicySpec = "all") -> nn.Module:
    """nnU-Net's ``get_network_from_plans`` (the same construction and weight initialisation, through nnU-Net's own
    function) building our checkpoint-aware subclass of the class the plans name.

    Raises:
        ValueError: when the plans name a network we have no checkpoint-aware copy of.
    """
    ours = checkpoint_class_for(arch_class_name)
    if ours is None:
        raise ValueError(f"nnUNetTrainerCkpt checkpoints {sorted(nnunet_network_classes())}; these plans name "
                         f"{arch_class_name!r}: train them with nnUNetTrainer, or plan with nnU-Net's default or "
                         "ResEnc planners.")
    network = get_network_from_plans(f"{ours.__module__}.{ours.__name__}", arch_kwargs, arch_kwargs_req_import,
                                     input_channels, output_channels, allow_init=allow_init,
                                     deep_supervision=deep_supervision)
    network.checkpoint_policy = checkpoint_policy
    return network


class nnUNetTrainerCkpt(nnUNetTrainer):  # noqa: N801 - nnU-Net's naming, which -tr matches
    """nnU-Net's ``nnUNetTrainer`` with the network its plans name replaced by our checkpoint-aware subclass
    (`monai_ckpt.nnunet.CheckpointPlainConvUNet`, `CheckpointResidualEncoderUNet`): the same training, in less
    memory. The policy: see `checkpoint_policy_of`. At inference (``nnUNetv2_predict -tr nnUNetTrainerCkpt``) the
    network runs its parent's forward.

    Example::

        export nnUNet_extTrainer=$(python -m monai_ckpt.nnunet trainers-path)
        nnUNetv2_train 3 3d_fullres 0 -tr nnUNetTrainerCkpt -p nnUNetResEncUNetLPlans
    """

    @staticmethod
    def build_network_architecture(plans_manager: Any, configuration_manager: Any, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return checkpointed_network_from_plans(
            configuration_manager.network_arch_class_name,
            configuration_manager.network_arch_init_kwargs,
            configuration_manager.network_arch_init_kwargs_req_import,
            num_input_channels,
            num_output_channels,
            allow_init=True,
            deep_supervision=enable_deep_supervision,
            checkpoint_policy=checkpoint_policy_of(configuration_manager.configuration),
        )
