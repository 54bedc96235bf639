"""Image work: reading, checking and upscaling images (`images`) and reviewing them (`review`:
content, duplicates, a person).

Imports `flows.specs` and `flows.models` only."""
