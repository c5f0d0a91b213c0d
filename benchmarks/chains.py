"""Generated chain specs shared by the scaling benchmarks beside this file."""


def chain_spec(layers: int, width: int = 16) -> str:
    """Spec text of a chain of `layers` nodes alternating linear (out `width`) and relu."""
    lines = ["graphgrow: 1", f"name: chain{layers}", f"input: {{shape: [{width}]}}", "layers:"]
    for k in range(layers):
        lines.append(f"  - {{name: fc{k}, op: linear, out: {width}}}" if k % 2 == 0 else
                     f"  - {{name: act{k}, op: relu}}")
    return "\n".join(lines) + "\n"
