"""Images in and out: reading that never crashes, writing, composites, resizing, image collections."""
