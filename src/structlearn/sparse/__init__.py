"""Pure sparse kernels: layer selection, density allocation, masks with exact counts."""
