// Renders an Ollama TEMPLATE with Go's own text/template, as Ollama does: the template reads
// .Messages (each with .Role and .Content), plus .System, .Prompt and .Response.
// Input on stdin: {"template": "...", "messages": [{"role": "...", "content": "..."}]}.
// Output on stdout: the rendered prompt, byte for byte.
package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

func main() {
	var in struct {
		Template string    `json:"template"`
		Messages []Message `json:"messages"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		os.Stderr.WriteString("bad input: " + err.Error() + "\n")
		os.Exit(2)
	}
	tmpl, err := template.New("").Option("missingkey=zero").Parse(in.Template)
	if err != nil {
		os.Stderr.WriteString("parse: " + err.Error() + "\n")
		os.Exit(3)
	}
	values := map[string]any{"Messages": in.Messages, "System": "", "Prompt": "", "Response": ""}
	if err := tmpl.Execute(os.Stdout, values); err != nil {
		os.Stderr.WriteString("execute: " + err.Error() + "\n")
		os.Exit(4)
	}
}
