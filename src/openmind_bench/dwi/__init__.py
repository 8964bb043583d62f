"""The DWI stage: 4D diffusion series -> T2w (mean b0), ADC and FA maps as index rows."""
