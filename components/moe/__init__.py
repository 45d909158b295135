"""Mixtures of LoRA experts inside a frozen network: batched expert application and the gates that weight them
(M3OE: task- and modality-aware, one weight vector per sample; AT-MoE: layer-wise grouped router)."""
