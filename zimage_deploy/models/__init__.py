"""Export-friendly torch modules for each Z-Image component."""
