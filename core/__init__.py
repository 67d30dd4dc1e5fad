"""The ground floor: what every other package may import, importing nothing of ours."""
