"""Physics: linear forward operators (CT with ASTRA, MRI with SigPy) and measurement noise."""
