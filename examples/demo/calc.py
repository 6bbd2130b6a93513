"""A tiny calculator library: what the demo's build packages and its tests exercise."""


def add(a, b):
    return a + b


def subtract(a, b):
    return a - b


def multiply(a, b):
    return a * b
