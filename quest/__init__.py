"""QuEST: knowledge distillation through a quantized embedding space of teacher features."""

from quest.losses import CosinePredictor, QuestLoss, soft_assign

__all__ = ["CosinePredictor", "QuestLoss", "soft_assign"]
__version__ = "0.1.0"
