"""Ray Serve: BlurDetectorDeployment, DeblurDeployment, the pipeline that wires them to the stream, `serve`."""
