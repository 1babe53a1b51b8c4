from moleflow.models.mole_nf import MoLESpatialAwareNF, build_flow
from moleflow.models.lora import LoRALinear, MoLESubnet
from moleflow.models.routing import PrototypeRouter, TaskPrototype
from moleflow.models.loss import moleflow_loss, patch_nll
