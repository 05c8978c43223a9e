"""Every model the toolkit uses, loaded in one place (`loading`): face detection, alignment and recognition
(`faces`), autoencoders (`autoencoder`), perceptual distances (`perceptual`), Arc2Face (`arc2face`) and verified
downloads (`downloads`)."""
