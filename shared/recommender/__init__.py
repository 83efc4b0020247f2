"""The recommender both sides train: text tower, fusion model, training (DP-SGD too),
metrics, the catalog's cold items, a run's experiment and its saved model."""
