"""Synthetic fetal echocardiography demo data (what `fetalssl-demo-data` writes): cine sweeps through the five
standard planes with per-frame labels, and labelled stills. Demo data, not part of the data pipeline:
`render` draws the scans, `generate` writes the data set."""
