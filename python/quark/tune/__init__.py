"""Fine-tuning: supervised fine-tuning (full and LoRA), instruction-data generation, domain adaptation."""
