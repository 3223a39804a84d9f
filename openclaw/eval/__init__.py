"""Eviction quality on real text: the fidelity (teacher-forced KL) and dormant-needle harnesses."""
