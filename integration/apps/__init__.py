"""Small applications that the process-level tests run under the real ``queueable-consume``."""
