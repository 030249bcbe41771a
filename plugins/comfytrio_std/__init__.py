"""The standard param types and asset resolvers of comfytrio."""
