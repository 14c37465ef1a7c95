"""Category management: the category service, its edits, the shot ledger, job promotion, geometry requests."""
