"""What a person looks at: `scanner report` (one self-contained HTML file about a scan) and
`scanner explain` (one image, its heatmap and the patches the detector chose, as a PNG).
"""
