"""The formal part of the engine: immutable records and pure transitions. No torch here."""
