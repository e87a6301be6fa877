"""Labels from people: query files, validated imports, Label Studio."""
