# Rules of the preprocess stage.
