"""Alignment: reward model, preference optimization (DPO/IPO/SimPO), online RL (GRPO), safety filter, red-team suite."""
