"""Stage `steer`: steered PEFT adapters from oriented atoms (and groups, compositions, controls) -> `variants/`."""
