"""How tensors move between ranks: process groups and the collectives of every parallel
layout, each with its tangent rule (a collective is linear, so the tangent takes the same
collective, packed with the primal where possible)."""
