"""The GPO game: state, one step (defend / attack stages), the stage schedule, the chunked loop."""
