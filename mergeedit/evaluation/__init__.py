"""Edit-quality evaluation: teacher-forced and generation metrics, locality against the pre-edit model."""
