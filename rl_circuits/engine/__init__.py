"""The attribution engine: edge graphs over TransformerLens hooks, EAP / EAP-IG / exact scores,
circuit evaluation. Depends on nothing else in the package but `errors`."""
