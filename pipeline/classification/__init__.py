"""Classification: MedMNIST import, MONAI classifiers, training, calibration, metrics, Grad-CAM, inference."""
