"""What CIFAR-10 is: ten classes of 3 x 32 x 32 uint8 images. One definition for the archive
reader, the model and the tools."""

NUM_CLASSES = 10
# Written into batches.meta of the official archive; the pipeline reads names from there.
OFFICIAL_CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer",
                        "dog", "frog", "horse", "ship", "truck")
IMAGE_SHAPE = (3, 32, 32)  # channel-major, exactly as the archive stores each 3072-byte row
