"""Test helpers for what an autograd graph holds."""
from collections import Counter

import torch


def autograd_node_counts(t: torch.Tensor) -> Counter:
    """How many nodes of each type the autograd graph behind ``t`` holds."""
    seen, counts, stack = set(), Counter(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        counts[type(node).__name__] += 1
        stack.extend(next_node for next_node, _ in node.next_functions)
    return counts
