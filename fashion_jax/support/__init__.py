"""Support: what every layer may use and that knows nothing of models or data: errors and paths,
platform choice (`backends`), process settings (`runtime`), device placement and compilation
(`parallel`), multi-process agreement (`multihost`), checkpoints (`checkpointing`), metric writers,
and fault injection for the reliability tests (`faults`)."""
